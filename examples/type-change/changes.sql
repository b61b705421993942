UPDATE public.products SET price = price + 199 WHERE id % 9 = 0;
DELETE FROM public.products WHERE id % 23 = 0;
INSERT INTO public.products (name, price) VALUES ('Penny', 1), ('Big ticket', 99999999);
