-- Worker heartbeats: which workers are alive, as every process reads it.

-- name: worker_beat
-- One statement per beat; rows of workers that stopped more than a week ago go with it.
with pruned as (
  delete from public.worker_heartbeats
  where stopped_at < %(now)s - interval '7 days'
)
insert into public.worker_heartbeats (worker_id, started_at, beat_at, sending)
values (%(worker_id)s, %(started_at)s, %(now)s, %(sending)s)
on conflict (worker_id) do update
set beat_at = excluded.beat_at, sending = excluded.sending, stopped_at = null,
    started_at = excluded.started_at
returning worker_id;

-- name: worker_stopped
update public.worker_heartbeats set stopped_at = %(now)s, beat_at = %(now)s
where worker_id = %(worker_id)s
returning worker_id;

-- name: last_worker_beat
-- The most recent beat of a worker that has not said it stopped (null: none is running, or none ever ran).
select max(beat_at) as beat_at, count(*) filter (where beat_at >= %(since)s) as alive
from public.worker_heartbeats where stopped_at is null;
