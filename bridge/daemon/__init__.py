"""The long-running process: loop, HTTP server, HA lease, scheduler, triggers and audit inputs."""
