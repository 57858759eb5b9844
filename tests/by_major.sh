#!/usr/bin/env bash
# `make test`: one pytest session per PostgreSQL major, at the same time. The first major's
# session runs every test on its clusters and the tests that need none; each other session runs
# the tests on a cluster of its major (their ids carry "pgNN"), and the second one also takes
# the slow tests that are not per major (the fleet and the browser), so the two take about as
# long. The first session prints as it goes, the others when they end; the exit status is the
# first non-zero one.
set -u
bin=${1:?usage: tests/by_major.sh VENV_BIN [pytest options]}
shift
IFS=, read -ra majors <<<"${PGTLS_PG_MAJORS:-15,17}"
# tests marked `spread` run each variant on one of these majors in turn (tests/conftest.py)
export PGTLS_SPREAD_MAJORS=${PGTLS_PG_MAJORS:-15,17}
# not per major, and slow: with a second session, they run there
moved=(tests/fleet tests/notebooks/test_browser.py)
moved_k="test_fleet or test_browser"
with_sigint='import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])'
scratch=$(mktemp -d -t pgtls-tests-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
pids=()
first_opts=()
for i in "${!majors[@]}"; do
  [ "$i" -gt 0 ] || continue
  major=${majors[$i]}
  select="pg$major"
  if [ "$i" -eq 1 ]; then
    select="$select or $moved_k"
    for path in "${moved[@]}"; do first_opts+=("--ignore=$path"); done
  fi
  # a job started with & (or from a shell that ignores SIGINT) ignores SIGINT: each session
  # gets the default back before pytest starts, for the fault tests' Ctrl-C
  PGTLS_PG_MAJORS=$major "$bin/python" -c "$with_sigint" "$bin/pytest" -p no:cacheprovider \
    -k "$select" --basetemp="$scratch/pg$major" "$@" >"$scratch/pg$major.log" 2>&1 &
  pids+=("$!")
done
PGTLS_PG_MAJORS=${majors[0]} "$bin/python" -c "$with_sigint" "$bin/pytest" \
  --basetemp="$scratch/pg${majors[0]}" "${first_opts[@]}" "$@"
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
