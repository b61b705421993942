CREATE TABLE public.user_profiles (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE
);
CREATE TABLE public.user_settings (
    user_id bigint PRIMARY KEY REFERENCES public.user_profiles (id),
    theme text NOT NULL DEFAULT 'light',
    locale text
);
INSERT INTO public.user_profiles (name, email)
SELECT 'User ' || i, 'u' || i || '@example.com' FROM generate_series(1, 5000) AS i;
-- Two users in three have settings.
INSERT INTO public.user_settings (user_id, theme, locale)
SELECT id, CASE WHEN id % 2 = 0 THEN 'dark' ELSE 'light' END, (ARRAY['en', 'de', 'ja'])[1 + id % 3]
FROM public.user_profiles WHERE id % 3 <> 0;
