#!/bin/sh
# Regenerate the committed fixtures in fixtures/ (see fixtures/README.md).
# Output differs between runs only in tar mtimes/pax times of the outer
# members and in openssl's random salts; the backed-up content is fixed.
set -eu
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
mkdir -p fixtures
printf '%s\n' 'correct horse battery staple' > fixtures/sample-backup.passphrase
python3 scripts/make_backup.py fixtures/sample-backup \
    --passphrase-file fixtures/sample-backup.passphrase \
    --sample "$tmp/sample" --image-mb 4 \
    --compression gzip --hmac SHA512 --hmac-style openssl1 \
    --contents fixtures/sample-backup.contents.json \
    --workdir "$tmp"
ls -l fixtures
