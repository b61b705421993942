-- source
SELECT p.id, p.name, p.email, coalesce(s.theme, 'light'), s.locale
FROM public.user_profiles p LEFT JOIN public.user_settings s ON s.user_id = p.id ORDER BY p.id;
-- target
SELECT id, name, email, theme, locale FROM public.users ORDER BY id;
