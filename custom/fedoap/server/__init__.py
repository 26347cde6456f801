"""What runs on the server: the workflow (rounds, checks, history) and the rules that combine the sites' updates."""
