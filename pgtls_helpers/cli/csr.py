"""``pgtls csr``: write server.key (0600) and server.csr, then show the CSR readably."""

from __future__ import annotations

import argparse
import sys

from pgtls_helpers.errors import InputError
from pgtls_helpers.pki.csr import load_csr, render_csr
from pgtls_helpers.pki.keys import KEY_TYPES, passphrase_from_env, passphrase_from_prompt
from pgtls_helpers.pki.subject import subject_from
from pgtls_helpers.postgres.keyfiles import write_key_and_csr

__all__ = ["main"]


def main(args: argparse.Namespace) -> int:
    """Run ``pgtls csr`` with parsed arguments; returns the exit status."""
    if args.key_type not in KEY_TYPES:
        raise InputError(
            f"--key-type {args.key_type!r} is not supported; use one of {', '.join(KEY_TYPES)}."
        )
    # the subject options are named as the fields of SUBJECT_FIELDS (--organizational-unit ...)
    subject = subject_from({**vars(args), "common_name": args.cn}, args.san)
    if args.passphrase_env and args.passphrase_prompt:
        raise InputError("Give --passphrase-env or --passphrase-prompt, not both.")
    passphrase = (
        passphrase_from_env(args.passphrase_env)
        if args.passphrase_env
        else passphrase_from_prompt()
        if args.passphrase_prompt
        else None
    )
    challenge = (
        passphrase_from_env(args.challenge_password_env) if args.challenge_password_env else None
    )
    key_path, csr_path = write_key_and_csr(
        args.out_dir,
        subject,
        args.key_type,
        passphrase=passphrase,
        overwrite=args.force,
        challenge_password=challenge,
    )
    csr = load_csr(csr_path.read_bytes(), str(csr_path))
    protection = "encrypted with the passphrase" if passphrase else "not encrypted"
    out = sys.stdout
    out.write(render_csr(csr) + "\n\n")
    out.write(f"Wrote {key_path} (mode 0600, {protection}) and {csr_path}.\n")
    out.write(
        f"Send only {csr_path} to the CA; {key_path} stays on this machine and is never sent.\n"
    )
    return 0
