-- Is any worker alive? Each running worker records a heartbeat here every few seconds (and when it
-- stops cleanly), so every process — the console's metrics included — can say how long it has been since
-- the last live one beat, even when every worker is down (nothing else notices that, not even at the
-- midnight expiry).
create table public.worker_heartbeats (
  worker_id text primary key check (length(worker_id) between 1 and 200),  -- host:pid
  started_at timestamptz not null,
  beat_at timestamptz not null,
  stopped_at timestamptz,                                                   -- null while running
  sending boolean not null                                                  -- false: the sync flag is off
);
create index worker_heartbeats_beat_at_idx on public.worker_heartbeats (beat_at desc) where stopped_at is null;

alter table public.worker_heartbeats enable row level security;
revoke all on public.worker_heartbeats from anon, authenticated;
grant all on public.worker_heartbeats to service_role;
