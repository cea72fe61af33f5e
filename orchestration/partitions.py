import dagster as dg

# one partition = one lake folder var/lake/events/date=YYYY-MM-DD/hour=HH; the current (still open) hour is a
# partition too, so a person can validate it from the UI; the hourly schedule validates the hour that just closed
hourly_events = dg.HourlyPartitionsDefinition(start_date="2026-01-01-00:00", timezone="UTC", end_offset=1)
