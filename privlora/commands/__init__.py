"""What a user types: `cli` (``privlora run | report | verify | predict | keys | audit | sweep``),
`sweep` (a grid of runs, resumable) and `audit` (one-run empirical privacy auditing). The top
layer: it may import anything below it, and nothing imports it."""
