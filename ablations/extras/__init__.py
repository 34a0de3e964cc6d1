"""Measurements a suite makes besides its trials (paper Tables 3-5 costs, Table 7 latency), for its report."""
