const _: () = ();
