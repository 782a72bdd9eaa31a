"""The experiment harness: grids of variants × seeds (compare), evaluation, the report."""
