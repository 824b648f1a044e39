"""The outer archive: BACKUP's bytes (a file, pieces, a pipe, a compressed
whole: sources), its tar members read in one pass with resync after damage
(tarstream, container), the names and order Qubes wrote them in (members),
other copies of it (copies), and the one tar-header parser qrecover has
(tarheaders), which the guard and formats 1 and 2 use too."""
