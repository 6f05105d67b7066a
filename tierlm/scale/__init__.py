"""Scale-out: data-parallel engine replicas behind one front end (Ray actors), with
prefix-aware routing and KV block transfer between replicas."""
