"""What builds and ships jobs: the NVFlare recipe, the committed jobs' export, and the POC / site set-up commands."""
