"""The write side of kb: discover files, parse them, chunk them; kb embeds and stores what this yields."""
