"""Input formats. Parquet today (`scoring.inputs.parquet`): planning, schema checks, reads."""
