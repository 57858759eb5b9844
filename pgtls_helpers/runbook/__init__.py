"""The change itself: parameters, the work directory, one module per step, rollback, and the
runner that executes the notebooks and writes the record."""
