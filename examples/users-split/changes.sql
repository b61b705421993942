UPDATE public.users SET full_name = 'Ada King Lovelace' WHERE id % 10 = 0;
UPDATE public.users SET bio = NULL WHERE id % 13 = 0;
DELETE FROM public.users WHERE id % 21 = 0;
INSERT INTO public.users (email, full_name) VALUES ('solo@example.com', 'Prince'), ('blank@example.com', '   ');
