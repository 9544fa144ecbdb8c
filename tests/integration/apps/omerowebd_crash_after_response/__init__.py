"""An OMERO.web app (omero.web.apps) whose workers die after every response once it is armed: a crash
loop that shows only after its generation took over, as a plugin with a crashing native extension, or a
leak the OOM killer ends, shows only once real traffic reaches it.

It imports, loads and answers like any app, so a generation with it boots and passes its probe. Once the
file ``armed`` exists beside this one (the test creates it when the generation serves: the fault's timing
is the test's, the fault is the app's), Django's request_finished, sent after gunicorn has written the
whole response, kills the worker with SIGKILL: the client has its answer, gunicorn sees a worker killed
and starts another, which dies after its first answer in turn. A generation without the app never dies.
"""
