"""The federation: one round engine and the parties it coordinates.

`startup` (the one start-up path of every run), `engine` (`RoundEngine`: sample, admit, charge,
instruct, sum, finish, evaluate, checkpoint), `server`, `client` (local DP-SGD), `node` (a
client's guard: its ledger, kept releases and secure-aggregation state), `messages` (the bytes
between parties), `transport` (the interface every transport implements), `secure_sum` (the
masked sum run through a transport), `keys`, `noise`, `preflight` and `deploy` (a node from its
node config). Knows tasks and strategies only through their interfaces, and no transport.
"""
