"""openpi's WebSocket policy protocol on the plugin's server (``WebsocketClientPolicy``).

``msgpack_numpy`` is the wire encoding, ``observations`` maps an openpi observation dict to
the model's cameras, state and instruction, ``server`` is the connection loop and routes.
"""
