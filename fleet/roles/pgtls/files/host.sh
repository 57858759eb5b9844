# One host's part of a fleet run (fleet/pgtls.yml, fleet/clients.yml, fleet/rollback.yml,
# fleet/renew.yml), in one call:
#   run:      stdin: a line with the CA's files for this host (a tar, base64; empty in phase 1),
#             then the parameters file; then `pgtls run`
#   clients:  the same, then `pgtls clients`; in phase 1 the clients' CSRs go into the outbox
#             as clients/<os_user>/postgresql.csr
#   rollback: `pgtls rollback` (phase rollback-dry-run: --dry-run), which writes its own record
#   renew:    stdin: an empty line, then the parameters file (params/<change>.renew.yaml); then
#             `pgtls renew` with the due threshold in $7 (--due-days=N, --due-fraction=F or
#             empty), which writes a record only when it renewed
# then the record (and in phase 1 the CSRs) packed into outbox/<stamp>.tar for the trip home;
# the last line names it: "pgtls-fleet-record: <stamp>". Exit status: the runbook's, or 75
# when the venv is missing or was installed from another wheelhouse (the playbook installs it
# and calls again).
set -u
mode=$1 home=$2 change=$3 venv=$4 want=$5 phase=$6 due=${7:-}
umask 077
mkdir -p "$home/params" "$home/work" "$home/records" "$home/outbox" "$home/ca"
rm -f "$home/outbox/"*.tar
if [ ! -x "$venv/bin/pgtls" ] || { [ -n "$want" ] && [ "$(cat "$venv/.pgtls-wheelhouse" 2>/dev/null)" != "$want" ]; }; then
  # what Ansible is still writing to stdin is read to its end first: leaving now would make
  # its write fail (a broken pipe, rc 32) instead of this "needs installing"
  cat > /dev/null
  echo "pgtls-fleet: $venv needs installing from the wheelhouse $want"
  exit 75
fi
params="$home/params/$change.yaml"
if [ "$mode" = run ] || [ "$mode" = clients ]; then
  IFS= read -r ca_files
  cat > "$params.tmp" && mv "$params.tmp" "$params"
  if [ -n "$ca_files" ]; then
    rm -rf "$home/ca/$change"
    mkdir -p "$home/ca/$change"
    printf '%s' "$ca_files" | base64 -d | tar -x -C "$home/ca/$change" || exit 2
  fi
  # $mode is run or clients: the pgtls command of the same name
  out=$("$venv/bin/pgtls" "$mode" "$params" --records "$home/records" --work "$home/work" --no-progress)
  rc=$?
elif [ "$mode" = renew ]; then
  params="$home/params/$change.renew.yaml"
  IFS= read -r _
  cat > "$params.tmp" && mv "$params.tmp" "$params"
  # $due is one option word or nothing; renew itself refuses a value it cannot use
  out=$("$venv/bin/pgtls" renew "$params" --records "$home/records" --work "$home/work" --no-progress $due)
  rc=$?
else
  if [ ! -f "$params" ]; then
    echo "pgtls-fleet: $params is missing: the change never ran on this host" >&2
    exit 2
  fi
  dry=
  [ "$phase" = rollback-dry-run ] && dry=--dry-run
  out=$("$venv/bin/pgtls" rollback "$params" --work "$home/work" --records "$home/records" $dry)
  rc=$?
fi
printf '%s\n' "$out"
# "record: <folder>/index.html" (or the folder itself)
rec=$(printf '%s\n' "$out" | sed -n 's/^.*record: \(\/.*\)$/\1/p' | tail -n 1)
case "$rec" in *.html) rec=$(dirname "$rec") ;; esac
if [ -n "$rec" ] && [ -d "$rec" ]; then
  stamp=$(basename "$rec")
  tar -C "$(dirname "$rec")" -cf "$home/outbox/$stamp.tar" "$stamp"
  if [ "$phase" = csr ] && [ "$rc" = 0 ] && [ "$mode" = clients ]; then
    # every client's CSR of this change, named by its OS user's folder
    (cd "$home/work/$change" 2>/dev/null && set -- clients/*/postgresql.csr &&
      if [ -f "$1" ]; then tar -rf "$home/outbox/$stamp.tar" "$@"; fi)
  elif [ "$phase" = csr ] && [ "$rc" = 0 ] && [ -f "$home/work/$change/server.csr" ]; then
    tar -C "$home/work/$change" -rf "$home/outbox/$stamp.tar" server.csr
  fi
  echo "pgtls-fleet-record: $stamp"
fi
exit "$rc"
