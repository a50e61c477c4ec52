-- Listing truth, proof side: every `certsync reconcile` (an operator's, or a worker's periodic one) is
-- recorded with its verdict, so that the metrics of every process report the same last verdict and the
-- console can show, per certification, what the last reconcile found (docs/listing-truth.md).

create table public.reconcile_runs (
  id uuid primary key default gen_random_uuid(),
  started_at timestamptz not null default now(),
  finished_at timestamptz,
  outcome text not null default 'running'
    check (outcome in ('running', 'agreed', 'mismatches', 'failed')),
  counts jsonb not null default '{}'::jsonb,            -- {kind: n} of the confirmed mismatches
  in_transit int not null default 0,                    -- skipped: an outbox event was still open
  repaired int not null default 0,                      -- repair events written (with --repair)
  error text,                                           -- one line, when outcome = 'failed'
  started_by text not null,                             -- "worker host:pid" or "cli host:pid"
  scheduled boolean not null default false              -- a worker's periodic run (one per interval)
);

-- The last finished run (metrics) and the last scheduled start (the workers' interval claim).
create index reconcile_runs_finished_at_idx on public.reconcile_runs (finished_at desc)
  where finished_at is not null;
create index reconcile_runs_scheduled_started_at_idx on public.reconcile_runs (started_at desc)
  where scheduled;

create table public.reconcile_mismatches (
  run_id uuid not null references public.reconcile_runs (id) on delete cascade,
  certification_id uuid not null,
  kind text not null
    check (kind in ('listed_but_should_not_be', 'unknown_to_database', 'missing', 'stale')),
  portal_version bigint,                                -- null: the portal lacks it
  database_version bigint,                              -- null: the database lacks it (in scope)
  primary key (run_id, certification_id)
);
-- "The last reconcile's verdict" for one certification.
create index reconcile_mismatches_certification_idx on public.reconcile_mismatches (certification_id);

alter table public.reconcile_runs enable row level security;
alter table public.reconcile_mismatches enable row level security;
revoke all on public.reconcile_runs, public.reconcile_mismatches from anon, authenticated;
grant all on public.reconcile_runs, public.reconcile_mismatches to service_role;
