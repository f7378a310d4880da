"""`flock bench`, the load test, the fake backend and the local stack they (and `flock eval`) start."""
