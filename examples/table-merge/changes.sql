-- Settings change alone: only the lookup table is written.
UPDATE public.user_settings SET theme = 'solarized' WHERE user_id % 10 = 1;
INSERT INTO public.user_settings (user_id, theme, locale) VALUES (3, 'dark', 'fr'), (6, 'dark', NULL);
DELETE FROM public.user_settings WHERE user_id % 25 = 2;
-- Profile changes, and a user removed with their settings.
UPDATE public.user_profiles SET name = name || ' (renamed)' WHERE id % 7 = 0;
DELETE FROM public.user_settings WHERE user_id = 4;
DELETE FROM public.user_profiles WHERE id = 4;
-- A new user and their settings in one transaction.
BEGIN;
INSERT INTO public.user_profiles (id, name, email) VALUES (9001, 'Newcomer', 'new@example.com');
INSERT INTO public.user_settings (user_id, theme, locale) VALUES (9001, 'dark', 'ja');
COMMIT;
