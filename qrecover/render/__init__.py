"""Everything a person reads: transcripts, narration, plans, scripts, the log."""
