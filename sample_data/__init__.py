"""Sample-data generators (synthetic slide cohorts for demos and measurements)."""
