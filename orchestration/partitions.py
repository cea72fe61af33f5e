import dagster as dg

# one partition = one lake folder var/lake/events/date=YYYY-MM-DD/hour=HH
hourly_events = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00", timezone="UTC", end_offset=1)
