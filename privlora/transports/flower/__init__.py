"""privlora on Flower's Message API: the same round engine, with Flower carrying the bytes.

- `server_app.app`: a ServerApp whose main builds the server side of a run (held-out data,
  global adapter, output folder) and drives `privlora.federation.engine.RoundEngine` through
  `transport.FlowerTransport` over Flower's grid;
- `client_app.app`: a ClientApp around `privlora.federation.node.ClientNode.handle`: each node builds its
  client from its own node config (`privlora.federation.deploy`), keeps its own ledger, and remembers its
  secure-aggregation session between messages in ``context.state`` (sealed, `state`);
- `local`: starts a SuperLink and SuperNodes on 127.0.0.1 (or Flower's simulation engine) and
  runs a config through them, ending every process it started.

Every message travels as Flower message type ``query.privlora`` whose content holds one
``ConfigRecord`` with the privlora message bytes (``privlora.federation.messages``).
"""

MESSAGE_TYPE = "query.privlora"
RECORD = "privlora"
