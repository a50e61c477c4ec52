-- The access audit's recorder (store/audit.py): hands one notification back to the database, which checks
-- its seal and stores the record it carries. True when stored; false for a forgery, garbage or a replay.

-- name: record_access_notification
select private.record_access_notification(%(token)s)
