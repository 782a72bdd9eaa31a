"""The study: grids of variants × seeds (compare), evaluation, the report."""
