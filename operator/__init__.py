"""Control plane: the Kopf operator (arrives with the operator issue)."""
