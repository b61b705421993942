-- source
SELECT id, full_name, email FROM public.profiles ORDER BY id;
-- target
SELECT id, display_name, email FROM public.profiles ORDER BY id;
