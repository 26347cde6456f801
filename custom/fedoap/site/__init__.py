"""What runs at a site: the Client API script, the site's privacy boundary and policy filter, its own configuration
and outputs, and the executor and app validator that let only this code run there. Never imports the server."""
