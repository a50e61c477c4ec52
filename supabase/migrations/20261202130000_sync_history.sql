-- One certification's sync history (`certsync history`, the console's History page): each attempt
-- with its time and the portal's answer, recorded durably and cheaply.
--
-- No table of attempts: a row per HTTP attempt would add a database round trip per attempt to the
-- delivery hot path. The failed attempts of one claim are appended to the event in the SAME statement
-- that closes or releases it (mark_delivered / mark_queued / release_claim); the successful one is
-- the delivered close itself (closed_at, attempts); replays are in the retry queue's failure_history.
-- Everything else the history shows (status, superseded_by, the queue entry, the last reconcile's
-- verdict) was recorded already. docs/architecture.md ("A certification's history") says more.

-- A constant default and no check constraint: adding the column is a catalogue change, with no
-- rewrite or scan of a large outbox under its lock. Only the three closes write it, always appending
-- an array (store/outbox.py).
alter table public.certification_sync_events
  add column attempt_log jsonb not null default '[]'::jsonb;

comment on column public.certification_sync_events.attempt_log is
  'failed portal calls of this event, oldest first: {claim, attempt, at, outcome, status, reason}';

-- Every event of one certification, in capture order: the open-events index covers only waiting and
-- in-flight ones, and a history must find delivered, superseded and queued ones (a deleted
-- certification's too) without scanning the outbox. One btree entry per event.
create index certification_sync_events_certification_idx
  on public.certification_sync_events (certification_id, capture_seq);

-- The table keeps its row-level security and privileges (20261129120200, 20261201110000): a new
-- column of an existing table needs no grant, and no API role can read it.
