UPDATE public.profiles SET full_name = full_name || ' Jr.' WHERE id % 10 = 0;
DELETE FROM public.profiles WHERE id % 17 = 0;
INSERT INTO public.profiles (full_name, email) VALUES ('Late Comer', 'late@example.com');
