-- wrk script: POST /orders of the example app, waiting for the outcome.
wrk.method = "POST"
wrk.body = '{"sku": "A-1", "quantity": 1}'
wrk.headers["Content-Type"] = "application/json"
