-- source
SELECT id, name, (price / 100.0)::numeric(10,2) FROM public.products ORDER BY id;
-- target
SELECT id, name, price FROM public.products ORDER BY id;
