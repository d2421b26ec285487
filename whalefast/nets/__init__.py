"""The nets layer: the backbone registry, heads, losses, the views a network is shown, and the one forward path over photos. It imports only core."""
