// Starts Swagger UI on this orchestrator's own document (a relative URL, so it also works
// behind a proxy that serves the orchestrator under a path prefix).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // No badge from validator.swagger.io: the page needs nothing from the network.
    validatorUrl: null,
  });
});
