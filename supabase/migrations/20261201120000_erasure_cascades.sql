-- Erasure: deleting a person's user (the Supabase dashboard's "Delete user", GoTrue's admin API, or
-- `delete from auth.users where id = …`) erases what certsync holds about that person. Their
-- chapter_memberships and peer_mentors row (with display_name) already cascade from auth.users; their
-- certifications restricted the delete of the peer_mentors row, so the dashboard's delete failed.
-- They now go with it: a certification is about one person and means nothing without them.
--
-- Nothing else refers to a certification by foreign key: the outbox (certification_sync_events) and
-- the retry queue keep their rows, which hold ids and certification states but no name or email.
-- Telling the portal (a delete event) is not done here; docs/security.md, "Erasure", says what is.
alter table public.certifications
  drop constraint certifications_peer_mentor_id_fkey,
  add constraint certifications_peer_mentor_id_fkey
    foreign key (peer_mentor_id) references public.peer_mentors (id) on delete cascade;
