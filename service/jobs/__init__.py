"""Job lifecycle rules shared by the API and the worker."""
