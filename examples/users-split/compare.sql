-- source
SELECT id, email, bio, created_at FROM public.users ORDER BY id;
-- target
SELECT id, email, bio, created_at FROM public.users ORDER BY id;
