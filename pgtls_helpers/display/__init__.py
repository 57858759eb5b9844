"""What the notebooks show: the CSR form, tables and pictures, rendered as plain HTML so an
executed notebook reads fully in its record."""
