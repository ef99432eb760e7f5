"""The volunteer daemon: train in the background, only while the machine is idle.

- ``daemon``         the daemon's lifecycle: config → sensor → control socket → watcher → peer
- ``config``         the daemon's TOML config file
- ``idle_policy``    when a volunteer's machine may train (games, schedule, heat, battery, caps)
- ``control_socket`` the daemon's local control socket (status, pause, resume, leave, stop)
- ``background``     the daemon as a background process: started, waited for, stopped
- ``status_text``    its status reply as a person reads it (`p2ptrain status`)
- ``sensors``        GPU facts (NVML, or a fake for tests), battery, this peer's TCP traffic
"""
