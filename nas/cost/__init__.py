"""What an architecture costs: parameters and MACs with attention counted, measured latency
(measure); per-block latency (blocks), lookup tables (table) and their build (table_build)."""
