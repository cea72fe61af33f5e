"""Column names of the lake and of the training frames.

A module of plain constants with no imports, so the model core (``pipelines.models``, which
needs only torch, numpy and pandas) can run where the service packages are not installed,
such as a bare GPU machine. :mod:`pipelines.schemas` re-exports them with the other contracts.
"""

COL_EVENT_ID = "event_id"
COL_EVENT_TYPE = "event_type"
COL_USER = "user_id"
COL_ITEM = "item_id"
COL_SESSION = "session_id"
COL_TS = "ts"
COL_WEIGHT = "weight"
COL_REQUEST_ID = "request_id"
