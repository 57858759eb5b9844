#!/usr/bin/env bash
# `make test`: one pytest session per PostgreSQL major, at the same time. The first major's
# session runs every test; each other session runs only the tests on a cluster of its major
# (their ids carry "pgNN"). The first session prints as it goes, the others when they end;
# the exit status is the first non-zero one.
set -u
bin=${1:?usage: tests/by_major.sh VENV_BIN [pytest options]}
shift
IFS=, read -ra majors <<<"${PGTLS_PG_MAJORS:-15,17}"
scratch=$(mktemp -d -t pgtls-tests-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
pids=()
for major in "${majors[@]:1}"; do
  PGTLS_PG_MAJORS=$major "$bin/pytest" -p no:cacheprovider -k "pg$major" \
    --basetemp="$scratch/pg$major" "$@" >"$scratch/pg$major.log" 2>&1 &
  pids+=("$!")
done
PGTLS_PG_MAJORS=${majors[0]} "$bin/pytest" --basetemp="$scratch/pg${majors[0]}" "$@"
status=$?
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  code=$?
  major=${majors[$((i + 1))]}
  echo "=================== the tests on PostgreSQL $major (exit $code) ==================="
  cat "$scratch/pg$major.log"
  [ "$status" -ne 0 ] || status=$code
done
exit "$status"
