"""The pure layer: subjects, keys, CSRs, reading CA responses, chain order, findings, and
libpq's host-name rules. Values in, values out; nothing here writes a file or opens a socket,
and nothing here imports another layer of the package."""
