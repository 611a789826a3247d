"""privlora on Flower's Message API: the same round engine, with Flower carrying the bytes.

- `server_app.app`: a ServerApp whose main builds the server side of a run (held-out data,
  global adapter, output folder) and drives `privlora.federation.engine.RoundEngine` through
  `transport.FlowerTransport` over Flower's grid;
- `client_app.app`: a ClientApp that, on a SuperNode whose node config names ``node-socket``,
  only relays message bytes to the node's long-lived node process
  (`privlora.federation.node_process`, ``privlora node serve``: data, ledger, key and model
  loaded once, one message at a time); on Flower's simulation engine it is the node itself
  (`privlora.federation.node.ClientNode.handle`, built from the node config of
  `privlora.federation.deploy`, its secure-aggregation session kept between messages in
  ``context.state``, sealed by `state`);
- `local`: starts a SuperLink, one node process and one relaying SuperNode per node on 127.0.0.1
  (or Flower's simulation engine) and runs a config through them, ending every process it started.

Every message travels as Flower message type ``query.privlora`` whose content holds one
``ConfigRecord`` with the privlora message bytes (``privlora.federation.messages``).
"""

MESSAGE_TYPE = "query.privlora"
RECORD = "privlora"
