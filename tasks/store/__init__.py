"""The Redis domain: jobs, batches, the worker registry and metrics, as read and written by the API
and the workers alike. Every key is named in keys.py and every state in states.py; every change of
a job or batch is one atomic Lua script (lua.py), so no reader ever sees half of one."""
